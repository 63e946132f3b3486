"""Sans-IO wire protocol: messages, tensor codec and handshake. Imports neither trio nor torch."""

from .codec import DTYPES as DTYPES
from .codec import array_from_wire as array_from_wire
from .codec import array_to_wire as array_to_wire
from .codec import decode as decode
from .codec import encode as encode
from .codec import encode_parts as encode_parts
from .handshake import Handshake as Handshake
from .handshake import HandshakeState as HandshakeState
from .messages import PROTOCOL_VERSION as PROTOCOL_VERSION
from .messages import Ack as Ack
from .messages import Activation as Activation
from .messages import Assign as Assign
from .messages import Assigned as Assigned
from .messages import Cancel as Cancel
from .messages import Checkpoint as Checkpoint
from .messages import Error as Error
from .messages import Heartbeat as Heartbeat
from .messages import Hello as Hello
from .messages import InputSpec as InputSpec
from .messages import LayerProfile as LayerProfile
from .messages import LinkReport as LinkReport
from .messages import Message as Message
from .messages import Probe as Probe
from .messages import Result as Result
from .messages import StageSpec as StageSpec
from .messages import WireTensor as WireTensor
