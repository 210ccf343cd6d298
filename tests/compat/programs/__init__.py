"""Programs written for Modal, run unchanged against shoal by ``tests/compat/test_modal_programs.py``.

Each follows one public example from modal-labs' examples repository (``13_sandboxes/``) call for call — the
same Modal API, in the same order, the way its users copy it — but is written here, not copied, and ends by
printing one ``RESULT <json>`` line for the test to check.  They are plain scripts that ``import modal``.
"""
