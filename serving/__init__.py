"""The BentoML service folder (``service.py``, ``bentofile.yaml``), shipped in the tuneloop wheel.

A package only so that ``importlib.resources.files("serving")`` finds the installed folder
(:func:`tuneloop.deployment.serving_dir`); BentoML loads ``service.py`` from the folder by path.
"""
