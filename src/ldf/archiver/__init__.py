"""Camera archiving (LDM-230 2.2, 2.3): LSSTCam and LATISS archivers."""
