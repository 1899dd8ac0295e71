"""The front door: every agent at `/agents/{id}/...` on one port (`front.listen`).

A process of its own (`python -m par.front`, unit `par-front.service`, its
listening socket held by `par-front.socket`), non-root and sandboxed.  It
knows agents only through the routes file pard publishes (`routes.py`) and
forwards with aiohttp (`proxy.py`, `websocket.py`); `server.py` holds the
connection limits and timeouts, `main.py` the process.
"""
