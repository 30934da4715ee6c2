"""Rebuild and deploy the defect-inspection service's CLIP indexes and PatchCore banks.

The library is importable without Airflow's scheduler: every piece that a DAG task
calls can be used and tested on its own. Heavy libraries (torch, open_clip, faiss)
are imported inside the functions that need them, never at module import time of
the modules the DAG files import.
"""

__version__ = "0.1.0"
