"""CurveZMQ encryption and authentication of every dasgd socket that crosses hosts.

``dasgd keys DIR -n N`` writes one key pair per node (``node-<i>``), one for the
parameter server (``server``) and one shared by the launchers (``launcher``),
with pyzmq's :func:`zmq.auth.create_certificates` (``NAME.key`` public,
``NAME.key_secret`` secret). With ``--curve-keys DIR`` every node inbox and
the rendezvous is a CURVE server that accepts only clients whose public key
is a ``*.key`` file in DIR (a ZAP handler, :class:`zmq.auth.thread.ThreadAuthenticator`);
every link is encrypted. A peer without an allowed key never gets a message
in: the handshake fails, nothing reaches the protocol, and the node counts it
(``auth_rejected`` in its logs). Copy the public keys to every host and each
host's secret keys (its nodes' and ``launcher``) to it.

The control channel between a launcher and its own nodes is local (``ipc://``
in a private temporary directory) and is not encrypted.
"""

from __future__ import annotations

from pathlib import Path

import zmq
import zmq.auth

from ..errors import ConfigError

__all__ = ["CurveKeys", "key_names", "write_keys"]


def key_names(n_nodes: int) -> list[str]:
    """Names of the key pairs of a run of ``n_nodes`` nodes (or PS workers)."""
    return [f"node-{i}" for i in range(n_nodes)] + ["server", "launcher"]


def write_keys(directory, n_nodes: int, *, force: bool = False) -> list[str]:
    """Write the key pairs of a run into ``directory`` (created); returns their names.

    Raises
    ------
    ConfigError
        If ``n_nodes`` < 1, or a key file exists and ``force`` is False (keys
        are never overwritten silently).
    """
    if not (isinstance(n_nodes, int) and n_nodes >= 1):
        raise ConfigError(f"number of nodes must be >= 1, got {n_nodes!r} (-n)")
    directory = Path(directory)
    names = key_names(n_nodes)
    existing = [n for n in names if (directory / f"{n}.key_secret").exists()]
    if existing and not force:
        raise ConfigError(
            f"{directory} already holds keys ({existing[0]}.key_secret ...): choose another "
            "directory or pass --force to replace them"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {directory}: {exc.strerror}") from None
    for name in names:
        zmq.auth.create_certificates(directory, name)
        (directory / f"{name}.key_secret").chmod(0o600)
    return names


class CurveKeys:
    """The key directory of a run: this process's key pair and every allowed public key.

    Parameters
    ----------
    directory : path-like
        Holds ``*.key`` (public) and this process's ``NAME.key_secret``.

    Raises
    ------
    ConfigError
        If the directory holds no public key.
    """

    def __init__(self, directory) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir() or not any(self.directory.glob("*.key")):
            raise ConfigError(
                f"no public keys (*.key) in {self.directory}: create them with "
                "`dasgd keys DIR -n N` (--curve-keys)"
            )

    def check(self, names_public, names_secret) -> None:
        """Raise :class:`ConfigError` naming the first missing key file."""
        for name, suffix in [
            *((n, "key") for n in names_public),
            *((n, "key_secret") for n in names_secret),
        ]:
            if not (self.directory / f"{name}.{suffix}").is_file():
                raise ConfigError(
                    f"{self.directory} has no {name}.{suffix}: create the run's keys with "
                    "`dasgd keys DIR -n N` and copy them to every host (--curve-keys)"
                )

    def public(self, name: str) -> bytes:
        """The public key of ``name``."""
        public, _ = zmq.auth.load_certificate(self.directory / f"{name}.key")
        return public

    def pair(self, name: str) -> tuple[bytes, bytes]:
        """(public, secret) of ``name``."""
        public, secret = zmq.auth.load_certificate(self.directory / f"{name}.key_secret")
        if secret is None:
            raise ConfigError(f"{self.directory / name}.key_secret holds no secret key")
        return public, secret

    def authenticator(self, ctx: zmq.Context):
        """A started ZAP handler on ``ctx`` accepting the directory's public keys (stop it at the end)."""
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=str(self.directory))
        return auth

    def make_server(self, sock: zmq.Socket, name: str) -> None:
        """Make ``sock`` (before bind) a CURVE server with ``name``'s key pair."""
        public, secret = self.pair(name)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True

    def make_client(self, sock: zmq.Socket, name: str, server: str) -> None:
        """Make ``sock`` (before connect) a CURVE client of ``server`` with ``name``'s key pair."""
        public, secret = self.pair(name)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = self.public(server)
