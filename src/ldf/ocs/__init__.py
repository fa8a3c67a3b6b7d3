"""OCS-commandable device model and the OCS bus.

The public API, re-exported here: `Device` and the state machine (`State`, `next_state`),
the bus (`Bus`, `open_bus`, `Subscription`, `Message`, `Ack`), and `CommandFailedError`.
Health endpoints live in `ldf.ocs.health` (imported on demand: it pulls in FastAPI).
"""

from ldf.ocs.bus import Bus, CommandFailedError, Subscription, open_bus
from ldf.ocs.device import STANDARD_COMMANDS, TRANSITIONS, Device, next_state
from ldf.ocs.models import Ack, AckCode, DeviceStatus, Kind, Message, State

__all__ = [
    "STANDARD_COMMANDS",
    "TRANSITIONS",
    "Ack",
    "AckCode",
    "Bus",
    "CommandFailedError",
    "Device",
    "DeviceStatus",
    "Kind",
    "Message",
    "State",
    "Subscription",
    "next_state",
    "open_bus",
]
