"""Repo ids are checked locally, before any token is read or any request is sent."""
from huggingface_hub.utils import HFValidationError, validate_repo_id

from deploy import DeployError


def check_repo_id(knob: str, value: str) -> str:
    """`value` must be `user/name` (or `org/name`) in the characters both hubs accept."""
    if not value:
        raise DeployError(f"{knob} is empty: pass {knob}=user/name")
    if value.count("/") != 1 or not value.isascii():
        raise DeployError(f"{knob}={value!r} is not a repo id: use user/name (ASCII letters, digits, - _ .)")
    try:
        validate_repo_id(value)
    except HFValidationError as e:
        raise DeployError(f"{knob}={value!r} is not a valid repo id: {e}") from None
    return value
