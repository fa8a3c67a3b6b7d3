"""Alert feeds on NATS JetStream: the service's publisher, the broker's source, credentials.

Layout
    One stream per broker, ``<PREFIX>_ALERTS_<broker>`` (subjects ``<prefix>.alerts.<broker>.>``,
    interest retention: a message leaves once its feed's consumer acknowledged it), one
    subject per feed, ``<prefix>.alerts.<broker>.<feed>``, and one durable pull consumer per
    feed, named after it, with the feed's ``max_ack_pending``, explicit acknowledgement and
    the feed's subject as its filter.

Messages
    The body is the entry's body (Confluent wire bytes for alerts, JSON for manifests and
    notifications). The headers carry the entry's header, one ``Ldf-<Key>`` each
    (``Ldf-Position``, ``Ldf-Kind``, ``Ldf-Alert-Id``, ``Ldf-Visit``, ``Ldf-Schema-Id``,
    ``Ldf-Format``, ``Ldf-Replay``), ``Ldf-Prev`` (the position of the feed's previous entry,
    0 for its first) and ``Nats-Msg-Id = <feed>:<position>``, so JetStream drops a message
    published twice (within its duplicate window) after a publisher crash.

Publisher (:class:`NatsPublisher`, in the service's process)
    A pump per NATS feed reads the feed from the service after its cursor, publishes a window
    of entries, waits for JetStream's acknowledgements and only then moves the feed's cursor
    (`AlertService.ack`). The service's cursor of a NATS feed therefore means "safely in
    JetStream"; the broker's own progress is its consumer's. Pumps are independent tasks: a
    feed whose broker stalls stops being pumped once ``max_backlog`` of its messages wait in
    JetStream (the rest waits in the service's log, on disk) and never holds up another.

Source (:class:`NatsFeedSource`, at the broker)
    Implements `ldf.alerts.client.FeedSource` over the feed's durable consumer. JetStream
    redelivers what a crashed consumer had not acknowledged only after ``ack_wait``, behind
    newer messages; the source therefore orders what it receives by the ``Ldf-Prev`` chain
    and presents an entry only once every earlier one has been presented: entries come in
    position order, without gaps. A redelivered entry at or before the consumer's position is
    acknowledged and dropped. Under `ldf.alerts.client.DurableConsumer` each entry is
    processed exactly once across crashes of the consumer, the publisher and the NATS server.
    Unlike HTTP, acknowledged entries are gone from JetStream: a consumer that lost its
    position resumes at what JetStream still holds (the gap is logged as an error; a replay
    from the service brings back the rest). One source reads a feed at a time.

Limits
    An entry larger than the server's ``max_payload`` (1 MB by default) cannot be published:
    its feed's pump retries, with a warning, and the feed lags until the limit is raised.

Credentials (:func:`nats_authorization`)
    Each broker is a NATS user allowed to pull from, acknowledge and inspect only its own
    stream's consumers, with replies on an inbox of its own (``_INBOX_<broker>``), so it cannot
    read another broker's feeds.
"""

from ldf.alerts.nats.credentials import nats_authorization, new_password
from ldf.alerts.nats.publisher import NatsPublisher, PublisherStats, PublisherThread
from ldf.alerts.nats.source import NatsFeedSource
from ldf.alerts.nats.wire import NatsNames, decode_header, encode_header

__all__ = [
    "NatsFeedSource",
    "NatsNames",
    "NatsPublisher",
    "PublisherStats",
    "PublisherThread",
    "decode_header",
    "encode_header",
    "nats_authorization",
    "new_password",
]
