"""The Telemetry Gateway (LDM-230 2.7): trusted producers' telemetry into the OCS bus."""
