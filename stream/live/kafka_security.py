"""TLS and SASL settings of every Kafka client the worker and the CLI build (docs/operations.md, "Kafka security").

One frozen value, built from the `--broker-*` flags and their variables (stream/cli/common.py), turned into
aiokafka's keyword arguments (`client_kwargs`, passed wherever a bootstrap string goes) and Faust's
`broker_credentials` (`faust_credentials`). The passwords come only from the environment or a file, never from a
flag (a flag shows in the process list), and never appear in its repr or in a log line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Mapping, Optional

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SASL_PASSWORD_ENV = "SCENESTREAM_BROKER_SASL_PASSWORD"     # the SASL password: this variable or a file, no flag
SSL_KEY_PASSWORD_ENV = "SCENESTREAM_BROKER_SSL_KEY_PASSWORD"   # the password of --broker-ssl-keyfile, if any

# The variable of each setting (the flags' too: stream/cli/common.py)
ENVVARS = {"security_protocol": "SCENESTREAM_BROKER_SECURITY_PROTOCOL", "ssl_cafile": "SCENESTREAM_BROKER_SSL_CAFILE",
           "ssl_certfile": "SCENESTREAM_BROKER_SSL_CERTFILE", "ssl_keyfile": "SCENESTREAM_BROKER_SSL_KEYFILE",
           "ssl_password": SSL_KEY_PASSWORD_ENV, "ssl_check_hostname": "SCENESTREAM_BROKER_SSL_CHECK_HOSTNAME",
           "sasl_mechanism": "SCENESTREAM_BROKER_SASL_MECHANISM", "sasl_username": "SCENESTREAM_BROKER_SASL_USERNAME",
           "sasl_password": SASL_PASSWORD_ENV}
PASSWORD_FILE_ENV = "SCENESTREAM_BROKER_SASL_PASSWORD_FILE"

NO_SECURITY: Mapping[str, Any] = MappingProxyType({})   # aiokafka's defaults: PLAINTEXT


@dataclass(frozen=True)
class KafkaSecurity:
    security_protocol: str = "PLAINTEXT"
    ssl_cafile: str = ""                 # "": the system's CAs
    ssl_certfile: str = ""               # client certificate (mutual TLS)
    ssl_keyfile: str = ""
    ssl_password: str = ""               # the passwords: masked in __repr__
    ssl_check_hostname: bool = True
    sasl_mechanism: str = "PLAIN"
    sasl_username: str = ""
    sasl_password: str = ""

    def __post_init__(self):
        if self.security_protocol not in PROTOCOLS:
            raise ValueError(f"broker security protocol {self.security_protocol!r} is not one of {PROTOCOLS}")
        if self.sasl_mechanism not in MECHANISMS:
            raise ValueError(f"SASL mechanism {self.sasl_mechanism!r} is not one of {MECHANISMS}")
        if self.sasl and not (self.sasl_username and self.sasl_password):
            raise ValueError(f"{self.security_protocol} needs --broker-sasl-username and a password "
                             f"({SASL_PASSWORD_ENV} or --broker-sasl-password-file)")
        if not self.sasl and (self.sasl_username or self.sasl_password):
            raise ValueError("a SASL user or password needs --broker-security-protocol SASL_SSL or SASL_PLAINTEXT")
        if not self.ssl and (self.ssl_cafile or self.ssl_certfile or self.ssl_keyfile):
            raise ValueError("SSL files need --broker-security-protocol SSL or SASL_SSL")

    def __repr__(self) -> str:   # the passwords masked, never shown
        def shown(name):
            value = getattr(self, name)
            return "'***'" if name.endswith("password") and value else repr(value)
        return "KafkaSecurity(" + ", ".join(f"{f.name}={shown(f.name)}" for f in fields(self)) + ")"

    @property
    def ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @classmethod
    def from_options(cls, protocol: str = "PLAINTEXT", cafile: Optional[str] = None, certfile: Optional[str] = None,
                     keyfile: Optional[str] = None, check_hostname: bool = True, mechanism: str = "PLAIN",
                     username: Optional[str] = None, password_file: Optional[str] = None) -> "KafkaSecurity":
        """The flags' values; the SASL password from `password_file` (its first line) or SASL_PASSWORD_ENV, the key's
        password from SSL_KEY_PASSWORD_ENV."""
        if password_file:
            with open(password_file, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        else:
            password = os.environ.get(SASL_PASSWORD_ENV, "") if protocol.startswith("SASL_") else ""
        return cls(protocol, cafile or "", certfile or "", keyfile or "", os.environ.get(SSL_KEY_PASSWORD_ENV, ""),
                   check_hostname, mechanism, username or "", password)

    def ssl_context(self):
        if not self.ssl:
            return None
        from aiokafka.helpers import create_ssl_context
        context = create_ssl_context(cafile=self.ssl_cafile or None, certfile=self.ssl_certfile or None,
                                     keyfile=self.ssl_keyfile or None, password=self.ssl_password or None)
        context.check_hostname = self.ssl_check_hostname
        return context

    def client_kwargs(self) -> Mapping[str, Any]:
        """Keyword arguments of AIOKafkaConsumer / AIOKafkaProducer / AIOKafkaAdminClient (one SSL context, shared)."""
        if self.security_protocol == "PLAINTEXT":
            return NO_SECURITY
        kw: dict[str, Any] = {"security_protocol": self.security_protocol, "ssl_context": self.ssl_context()}
        if self.sasl:
            kw.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                      sasl_plain_password=self.sasl_password)
        return MappingProxyType(kw)

    def faust_credentials(self):
        """faust.App's `broker_credentials`: None for PLAINTEXT."""
        import faust
        if self.sasl:
            return faust.SASLCredentials(username=self.sasl_username, password=self.sasl_password,
                                         ssl_context=self.ssl_context(), mechanism=self.sasl_mechanism)
        return faust.SSLCredentials(self.ssl_context()) if self.ssl else None

    def environ(self) -> dict[str, str]:
        """These settings as the variables `scenestream worker` reads (for a child worker: no password in argv)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["ssl_check_hostname"] = "1" if self.ssl_check_hostname else "0"
        return {ENVVARS[name]: value for name, value in values.items() if value}
