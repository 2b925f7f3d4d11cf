"""One module per VPR method, on a shared DINOv2 backbone (``dinov2.py``, ``vpr_model.py``).

Each module declares everything about its method and registers it (``export/registry.py``).
Adding a method: write its module and add its name to this list, nothing else.
"""
METHOD_MODULES = ("gem", "salad", "selavpr", "cricavpr", "megaloc", "boq")
