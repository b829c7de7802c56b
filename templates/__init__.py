"""Report templates and assets.

This folder ships inside the wheel as the data package ``auditor._templates``
(see ``auditor/report/env.py``); it holds no code.
"""
