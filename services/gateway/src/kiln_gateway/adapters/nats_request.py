"""A core NATS request to another service, as the gateway's adapters make it: no answer (no
responder, or none in time) is the caller's own "unavailable" error."""

from __future__ import annotations

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import BaseModel


async def request(
    nc: Client,
    subject: str,
    message: BaseModel,
    *,
    timeout_s: float,
    service: str,
    unavailable: type[Exception],
) -> bytes:
    """The data of the ``service``'s reply to ``message`` on ``subject``; ``unavailable`` if
    no one answers, or not within ``timeout_s``."""
    try:
        msg = await nc.request(subject, message.model_dump_json().encode(), timeout=timeout_s)
    except NoRespondersError as err:
        raise unavailable(f"no {service} service is answering") from err
    except (NatsTimeoutError, TimeoutError) as err:
        raise unavailable(f"the {service} service did not answer in {timeout_s} s") from err
    return msg.data
