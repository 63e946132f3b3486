"""Transports: one interface (:class:`Transport`), an in-memory and a websocket adapter."""

from .base import Connection as Connection
from .base import ConnectionHandler as ConnectionHandler
from .base import Transport as Transport
from .memory import MemoryNetwork as MemoryNetwork
from .peer import Peer as Peer
from .peer import dial_peer as dial_peer
from .peer import open_peer as open_peer
from .retry import dial as dial
from .websocket import WebsocketTransport as WebsocketTransport
from .websocket import is_tls as is_tls
from .websocket import parse_address as parse_address
