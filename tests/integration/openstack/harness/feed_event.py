"""Put one Ceilometer-shaped event on the topic where the harness's aodh-listener evaluates event alarms.

Run with the Aodh venv's python (it has oslo.messaging):
    HEADWATER_AODH_EVENT_TOPIC=alarm.all.PORT venv-aodh/bin/python feed_event.py PROJECT_ID EVENT_TYPE [trait=value ...]
The topic is the run's `[listener] event_alarm_topic` (alarm.all.<aodh port>: runs share RabbitMQ).
This is what ceilometer-agent-notification's `notifier://?topic=alarm.all` publisher sends, so the
harness need not install ceilometer to fire a real Aodh event alarm. Prints the event's message_id.
"""
import datetime
import os
import sys
import uuid

import oslo_messaging
from oslo_config import cfg


def main() -> None:
    project, event_type, *pairs = sys.argv[1:]
    url = "rabbit://guest:guest@127.0.0.1:5672/"
    conf = cfg.ConfigOpts()
    conf([], project="headwater-feeder")
    topic = os.environ.get("HEADWATER_AODH_EVENT_TOPIC", "alarm.all")
    # ceilometer publishes on its own control exchange; queue <topic>.sample is bound there
    oslo_messaging.set_transport_defaults("ceilometer")
    transport = oslo_messaging.get_notification_transport(conf, url=url)
    notifier = oslo_messaging.Notifier(transport, publisher_id="telemetry.publisher.headwater-test",
                                       driver="messagingv2", topics=[topic])
    now = datetime.datetime.utcnow().isoformat()
    traits = [["project_id", 1, project], ["service", 1, "headwater-test"]]
    traits += [[k, 1, v] for k, v in (p.split("=", 1) for p in pairs)]
    event = {"message_id": str(uuid.uuid4()), "event_type": event_type, "generated": now,
             "traits": traits, "raw": {}, "message_signature": "unsigned"}
    notifier.sample({}, "event", [event])
    transport.cleanup()
    print(event["message_id"])


if __name__ == "__main__":
    main()
