# The consumer the source write-ups show: XREADGROUP COUNT 100, one XACK per entry.
import sys
import redis

url, stream, group, consumer = sys.argv[1:5]
r = redis.Redis.from_url(url)
while True:
    events = r.xreadgroup(group, consumer, {stream: ">"}, count=100, block=1000)
    for _stream, messages in events:
        for message_id, fields in messages:
            r.xack(stream, group, message_id)
