"""What the simulated server and sites say to each other (on top of object pull and push).

Per round r:
1. server -> site, request TOPIC_ROUND {"round": r, "ref": RID or null}: with a RID the site
   pulls the global model from the server; with null the model comes by push (stream_ctx
   {"round": r}). The site answers at once; the work runs on its own thread.
2. site -> server, request TOPIC_UPDATE {"round": r, "ref": RID, "samples": n}: the site's
   update is ready for the server to pull; the site ends that transaction once the server
   downloaded it.
TOPIC_PING lets the server tell a silent site from a dead one.
"""

CHANNEL = "__fedstream_sim__"
TOPIC_ROUND = "round"
TOPIC_UPDATE = "update"
TOPIC_PING = "ping"
TOPIC_MODEL = "model"  # push: the global model

SERVER = "server"

# Events the server prints, one JSON object per stdout line, for the parent to render.
EV_ROUND_START = "round_start"
EV_SITE_DOWN = "site_down"  # the site holds the global model
EV_SITE_UP = "site_up"  # the server holds the site's update
EV_SITE_MISSING = "site_missing"
EV_ROUND_DONE = "round_done"
EV_FINAL = "final"
