"""Runtime shared by the app, the terminal chat and checkpoint evaluation.

Serving images ship app.py, api.py and chat/ only, so nothing here may import xtuner, mmengine,
deepspeed or training/.
"""
