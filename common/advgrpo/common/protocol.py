"""gRPC metadata the server and the client agree on, beside the proto (advgrpo.reward.v1).

Other clients may read these too; they are part of the public contract (README, "Statuses").
"""

# gRFC A6's server pushback trailer (https://github.com/grpc/proposal/blob/master/A6-client-retries.md,
# "Pushback"), which gRPC's own retry reads. A transient refusal (RESOURCE_EXHAUSTED: a full queue,
# the decoded-bytes budget in use by other requests) carries the milliseconds to wait before sending
# the same request again; a RESOURCE_EXHAUSTED that fails the same way every time (a size limit)
# carries NO_RETRY_PUSHBACK, a negative value, which per A6 means "do not retry". HTTP sends
# Retry-After for the transient ones.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
NO_RETRY_PUSHBACK = "-1"

# Initial metadata a ScoreStream sends as soon as the server has accepted it, so a client can tell
# a stream that was up (and later failed: the server restarted) from one that never got through.
STREAM_OPEN_KEY = "advgrpo-stream-open"
