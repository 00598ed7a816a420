"""KeyFace outside ComfyUI: the `keyface` command line and its engines (local, Ray).

The protocol lives in keyface_core; this package only adapts it to files, folders and processes.
"""
