"""Fedward's kernel: what the coordinator and the site agent share.

The wire protocol (:mod:`fedward.wire`), the task and model registry (:mod:`fedward.tasks`,
:mod:`fedward.models`), certificates, process and file helpers, the sandbox of the Flower
processes, and every touch of Flower's internals (:mod:`fedward.flower`). It imports
neither :mod:`coordinator` nor :mod:`site_agent`; importing ``fedward`` and its top-level
modules loads neither torch nor flwr (only :mod:`fedward.models` and :mod:`fedward.flower`
may).
"""
