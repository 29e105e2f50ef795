# A careful hand-written consumer: XREADGROUP COUNT 500, one XACK per batch.
import sys
import redis

url, stream, group, consumer = sys.argv[1:5]
r = redis.Redis.from_url(url)
while True:
    events = r.xreadgroup(group, consumer, {stream: ">"}, count=500, block=1000)
    ids = [message_id for _stream, messages in events for message_id, _fields in messages]
    if ids:
        r.xack(stream, group, *ids)
