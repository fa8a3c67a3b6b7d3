"""The simulated observatory: instruments, sky, camera, scheduler."""
