"""Bounce processing (docs/bounces.md): detection (``detect``), the score model (``score``), notices.

The ``bounces`` runner (``mailq/runners/bounces.py``) and the ``bounce-warnings`` cron task use these;
``mailqctl bounces`` reads and resets what they record with each member in the list database.
"""
