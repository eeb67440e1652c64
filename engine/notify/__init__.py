"""Notifications to patients (通知): what happened to their bookings, told once.

``engine.notify.worker`` plans a message per outbox event that PostgreSQL
has recorded (so never before the event is durable), per refund done and
per visit reminder due, and sends each through a ``Notifier``: the WeChat
mini-program subscribe message (``engine.notify.wechat``), an SMS gateway
(``engine.notify.sms``), or the simulator in tests and the demo
(``engine.testing.notify_simulator``).
"""

from engine.notify.base import KINDS, Message, Notifier, SendResult

__all__ = ["KINDS", "Message", "Notifier", "SendResult"]
