"""gRPC metadata the server and the client agree on, beside the proto (advgrpo.reward.v1).

Other clients may read these too; they are part of the public contract (README, "Statuses").
"""

# Trailer of a transient refusal (RESOURCE_EXHAUSTED: a full queue, the decoded-bytes budget in
# use): milliseconds to wait before sending the same request again. HTTP sends Retry-After.
RETRY_AFTER_KEY = "advgrpo-retry-after-ms"

# Initial metadata a ScoreStream sends as soon as the server has accepted it, so a client can tell
# a stream that was up (and later failed: the server restarted) from one that never got through.
STREAM_OPEN_KEY = "advgrpo-stream-open"
