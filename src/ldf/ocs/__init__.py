"""OCS-commandable device model and the OCS bus."""
