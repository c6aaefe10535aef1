"""Real servers for tests and bench scripts: PostgreSQL, an SMTP sink, a private Postfix.

Each server is a context manager bound to 127.0.0.1 on a free port, with its own
temporary directory that is removed on exit.  PostgreSQL and Postfix run under a
tiny "reaper" process (a child subreaper): daemons that fork and detach are
reparented to it instead of to PID 1, so stopping leaves neither processes nor
zombies behind, even in containers whose init never reaps orphans.  If the test
process dies, the reaper stops the service and removes its directory; as that is
PR_SET_PDEATHSIG, start servers from a thread that outlives them (e.g. the main one).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import select
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from glob import glob
from pathlib import Path
from types import TracebackType
from typing import ClassVar, NamedTuple, Self

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

# Runs as `python reaper.py CONFIG_JSON STATUS_FD`: starts CONFIG["cmd"], adopts its
# orphans, forwards SIGTERM as CONFIG["signal"] to the pid in CONFIG["pidfile"],
# writes the command's exit code to STATUS_FD, and exits once every descendant is gone,
# removing CONFIG["cleanup"] if our parent died meanwhile.
_REAPER = r"""
import ctypes, json, os, signal, subprocess, sys
cfg = json.loads(sys.argv[1])
status_fd = int(sys.argv[2])
parent = os.getppid()
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(36, 1, 0, 0, 0)                # PR_SET_CHILD_SUBREAPER
libc.prctl(1, signal.SIGTERM, 0, 0, 0)    # PR_SET_PDEATHSIG: our parent died -> stop
child = None
def forward(signum, frame):
    try:
        with open(cfg["pidfile"]) as f:
            pid = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pid = child.pid if child else None
    if pid:
        try:
            os.kill(pid, cfg["signal"])
        except ProcessLookupError:
            pass
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
os.set_inheritable(status_fd, False)
user = cfg.get("user")
child = subprocess.Popen(
    cfg["cmd"], cwd=cfg.get("cwd"), stdin=subprocess.DEVNULL,
    user=user, group=cfg.get("gid"), extra_groups=[] if user else None,
)
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    if pid == child.pid:
        child.returncode = os.waitstatus_to_exitcode(status)
        try:
            os.write(status_fd, b"%d\n" % child.returncode)
        except OSError:  # our parent is gone
            pass
        os.close(status_fd)
if os.getppid() != parent:  # nobody is left to clean up after us
    import shutil
    shutil.rmtree(cfg["cleanup"], ignore_errors=True)
"""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sbin(name: str) -> str:
    """Find a system binary even when /usr/sbin is not on PATH."""
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


def _descendants(root: int) -> list[int]:
    """Return the pids of every live descendant of `root`."""
    children: dict[int, list[int]] = {}
    for stat in glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


class _Reaped:
    """A command run under the reaper, with its output in `log_path`."""

    def __init__(
        self,
        cmd: list[str],
        *,
        log_path: Path,
        pidfile: Path,
        stop_signal: int,
        user: str | None = None,
        cwd: Path | None = None,
    ) -> None:
        config = {
            "cmd": cmd,
            "pidfile": str(pidfile),
            "signal": stop_signal,
            "cleanup": str(log_path.parent),
            "cwd": str(cwd) if cwd else None,
            "user": user,
            "gid": pwd.getpwnam(user).pw_gid if user else None,
        }
        script = log_path.parent / "reaper.py"  # a file, so `ps` shows a readable line
        script.write_text(_REAPER)
        read_fd, write_fd = os.pipe()
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), json.dumps(config), str(write_fd)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(write_fd,),
                start_new_session=True,
            )
        os.close(write_fd)
        self._status = os.fdopen(read_fd, "rb")

    def exit_code(self, timeout: float) -> int | None:
        """Wait up to `timeout` s for the command to exit; None if still running."""
        ready, _, _ = select.select([self._status], [], [], timeout)
        if not ready:
            return None
        line = self._status.readline()
        return int(line) if line.strip() else -1

    def stop(self, timeout: float = 10.0) -> None:
        """Signal the service to stop, then kill whatever is left after `timeout` s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in _descendants(self.proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self._status.close()


class _Server:
    """Context-manager plumbing shared by the servers."""

    def start(self) -> Self:
        """Start the server; subclasses implement it."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server; subclasses implement it."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _ReapedServer(_Server):
    """A daemon run under a reaper process in a private directory of its own."""

    dir: Path | None = None
    _reaped: _Reaped | None = None

    def stop(self) -> None:
        """Stop the daemon and everything it started, then remove its directory."""
        if self._reaped is not None:
            self._reaped.stop()  # SIGQUIT for postmaster (as -m immediate), SIGTERM for Postfix
            self._reaped = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Freeze the daemon's processes (SIGSTOP) for a while: a hung service.

        The kernel still accepts connections, but nothing answers until the end of the
        ``with`` block, when every process is continued (SIGCONT).
        """
        assert self._reaped is not None, "server not started"
        pids = _descendants(self._reaped.proc.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)


def _private_dir(prefix: str, tmpdir: str | os.PathLike[str] | None, user: str | None) -> Path:
    """Make a fresh directory under `tmpdir` that `user` can reach, else under the system temp."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=tmpdir))
    path.chmod(0o755)
    if user is None or _reachable(path, pwd.getpwnam(user)):
        return path
    path.rmdir()
    # pytest's /tmp/pytest-of-root is 0700: a service user cannot traverse it.
    return _private_dir(prefix, None, None) if tmpdir is not None else path


def _reachable(path: Path, user: pwd.struct_passwd) -> bool:
    """Tell whether `user` may traverse every ancestor of `path` (ignoring ACLs)."""
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for parent in path.parents:
        st = parent.stat()
        if st.st_uid == user.pw_uid:
            bit = 0o100
        elif st.st_gid in groups:
            bit = 0o010
        else:
            bit = 0o001
        if not st.st_mode & bit:
            return False
    return True


class PostgresServer(_ReapedServer):
    """A throw-away PostgreSQL cluster on 127.0.0.1 with trust auth and fsync off."""

    def __init__(self, tmpdir: str | os.PathLike[str] | None = None) -> None:
        self.tmpdir = tmpdir
        self.user = "postgres" if os.geteuid() == 0 else None  # root may not run postgres
        self.host = "127.0.0.1"
        self.port = 0
        self.dir: Path | None = None
        self._reaped: _Reaped | None = None

    @staticmethod
    def bindir() -> Path:
        """Return the directory of the newest installed PostgreSQL server binaries."""
        found = sorted(
            glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[-3])
        )
        if found:
            return Path(found[-1]).parent
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip())

    @property
    def datadir(self) -> Path:
        """The cluster's data directory (the unix socket lives beside it)."""
        assert self.dir is not None, "server not started"
        return self.dir / "data"

    def start(self) -> Self:
        """Create the cluster with initdb and start the postmaster; return self."""
        self.dir = _private_dir("cleanmail-pg-", self.tmpdir, self.user)
        if self.user:
            shutil.chown(self.dir, self.user, self.user)
        self._run_as_user(
            [
                str(self.bindir() / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ]
        )
        for _attempt in range(3):
            if self._start_postmaster(free_port()):
                return self
            self._reaped.stop()  # type: ignore[union-attr]
            if "Address already in use" not in self.log():
                break  # only a port taken since free_port() is worth a retry
        log = self.log()
        self.stop()
        raise RuntimeError("PostgreSQL did not start:\n" + log)

    def _run_as_user(self, cmd: list[str]) -> None:
        """Run a command to completion as the server's OS user."""
        result = subprocess.run(
            cmd,
            cwd=self.dir,
            user=self.user,
            group=self.user,
            extra_groups=[] if self.user else None,
            capture_output=True,
            text=True,
        )
        if result.returncode:
            raise RuntimeError(f"{cmd[0]} failed:\n{result.stdout}{result.stderr}")

    def _start_postmaster(self, port: int) -> bool:
        """Start the postmaster on `port`; return whether it became ready."""
        assert self.dir is not None
        self.port = port
        settings = {
            "listen_addresses": self.host,
            "port": port,
            "unix_socket_directories": self.dir,
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        cmd = [str(self.bindir() / "postgres"), "-D", str(self.datadir)]
        for name, value in settings.items():
            cmd += ["-c", f"{name}={value}"]
        pidfile = self.datadir / "postmaster.pid"
        self._reaped = _Reaped(
            cmd,
            log_path=self.dir / "postgres.log",
            pidfile=pidfile,
            stop_signal=signal.SIGQUIT,
            user=self.user,
            cwd=self.dir,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._reaped.exit_code(0.02) is not None:
                return False
            with contextlib.suppress(OSError, IndexError):
                lines = pidfile.read_text().splitlines()
                if lines[3] == str(port) and lines[7].strip() == "ready":
                    return True
        return False

    def log(self) -> str:
        """Return the server log."""
        assert self.dir is not None
        return (self.dir / "postgres.log").read_text(errors="replace")

    def conninfo(self, dbname: str = "postgres") -> str:
        """Return a libpq connection string for psycopg."""
        return f"host={self.host} port={self.port} user=postgres dbname={dbname}"

    def url(self, dbname: str = "postgres") -> str:
        """Return an SQLAlchemy URL for `dbname`."""
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{dbname}"

    def create_database(self, name: str) -> None:
        """Create an empty database called `name`."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


class _LenientSMTP(SMTP):
    """Accepts lines longer than RFC 5321's 1,000 bytes, as Postfix does."""

    line_length_limit = 1024 * 1024


class _LenientController(Controller):
    """A controller that serves _LenientSMTP."""

    def factory(self) -> SMTP:
        """The SMTP protocol instance for one connection."""
        return _LenientSMTP(self.handler, **self.SMTP_kwargs)


class ReceivedMessage(NamedTuple):
    """One message as an SMTP server received it."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes


class SmtpSink(_Server):
    """An aiosmtpd server that records what it receives; set `refuse` to fail DATA.

    ``pipelining`` makes it advertise PIPELINING as Postfix does (aiosmtpd reads
    pipelined commands either way); ``refuse_rcpt`` maps recipients to a refusal;
    ``timeout`` is how long an idle connection stays open (aiosmtpd then says 421).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        on_message: Callable[[ReceivedMessage], None] | None = None,
        *,
        pipelining: bool = False,
        timeout: float = 300.0,
    ) -> None:
        self.host = host
        self.port = port
        self.pipelining = pipelining
        self.timeout = timeout
        self.refuse: str | None = None  # e.g. "451 4.3.0 try later"
        self.refuse_rcpt: dict[str, str] = {}  # e.g. {"x@example.no": "550 5.1.1 unknown"}
        self.on_message = on_message  # runs before recording; an exception answers 451
        self._messages: list[ReceivedMessage] = []
        self._changed = threading.Condition()
        self._controller: Controller | None = None

    @property
    def messages(self) -> list[ReceivedMessage]:
        """A snapshot of the messages received so far."""
        with self._changed:
            return list(self._messages)

    def clear(self) -> None:
        """Forget the messages received so far."""
        with self._changed:
            self._messages.clear()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Wait until at least `count` messages arrived; return them or raise TimeoutError."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._messages) >= count, timeout):
                raise TimeoutError(f"{len(self._messages)} of {count} messages arrived")
            return list(self._messages)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """aiosmtpd's EHLO reply, with PIPELINING when asked to offer it."""
        session.host_name = hostname
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        """Take the recipient, unless `refuse_rcpt` names it."""
        if address in self.refuse_rcpt:
            return self.refuse_rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Record the message, or answer with `refuse`."""
        if self.refuse:
            return self.refuse
        message = ReceivedMessage(
            envelope.mail_from or "", list(envelope.rcpt_tos), envelope.original_content or b""
        )
        if self.on_message is not None:
            try:
                self.on_message(message)
            except Exception as exc:
                return f"451 4.3.0 sink callback failed: {exc!r}"[:500]
        with self._changed:
            self._messages.append(message)
            self._changed.notify_all()
        return "250 2.0.0 OK"

    def start(self) -> Self:
        """Start listening in a background thread; return self."""
        for _attempt in range(3):
            port = self.port or free_port()
            controller = _LenientController(
                self,
                hostname=self.host,
                port=port,
                server_hostname="sink.cleanmail.invalid",
                data_size_limit=None,
                ready_timeout=10,
                timeout=self.timeout,
            )
            try:
                controller.start()
            except OSError:
                if self.port:
                    raise
                continue
            self._controller, self.port = controller, port
            return self
        raise RuntimeError("SmtpSink could not bind a port")

    def stop(self) -> None:
        """Stop the server thread."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


class PostfixServer(_ReapedServer):
    """A private Postfix instance set up as the after-queue content-filter front."""

    # What the README tells users to add; {filter_port} is Cleanmail's filter daemon,
    # {reinject_port} the smtpd that takes filtered mail back.
    MAIN_CF_FILTER_LINES: ClassVar[str] = """\
content_filter = scan:[127.0.0.1]:{filter_port}
"""
    MASTER_CF_FILTER_LINES: ClassVar[str] = """\
scan      unix  -       -       n       -       10      smtp
  -o smtp_send_xforward_command=yes
  -o disable_mime_output_conversion=yes
  -o smtp_data_done_timeout=1200
  -o smtp_generic_maps=
  -o smtp_tls_security_level=none
127.0.0.1:{reinject_port} inet  n  -  n  -  10  smtpd
  -o syslog_name=postfix/reinject
  -o content_filter=
  -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters,no_address_mappings
  -o smtpd_helo_restrictions=
  -o smtpd_client_restrictions=
  -o smtpd_sender_restrictions=
  -o smtpd_relay_restrictions=
  -o smtpd_recipient_restrictions=permit_mynetworks,reject
  -o smtpd_data_restrictions=
  -o mynetworks=127.0.0.0/8
  -o smtpd_authorized_xforward_hosts=127.0.0.0/8
"""
    # Test-only settings: relay everything from loopback to the sink, no local
    # delivery, no DNS, fast retries, log to a file through postlogd.
    _MAIN_CF: ClassVar[str] = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
myhostname = postfix-test.cleanmail.invalid
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 local delivery is disabled
alias_maps =
alias_database =
relay_domains =
relayhost = [127.0.0.1]:{sink_port}
default_transport = smtp
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
smtp_tls_security_level = none
smtpd_tls_security_level = none
smtpd_error_sleep_time = 0
message_size_limit = {message_size_limit}
mailbox_size_limit = 0
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
smtp_connect_timeout = 2s
biff = no
"""
    _MASTER_CF: ClassVar[str] = """\
127.0.0.1:{front_port} inet  n  -  n  -  -  smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

    _MAIN_CF_EXTRA: ClassVar[str] = ""  # what a subclass adds to main.cf and master.cf
    _MASTER_CF_EXTRA: ClassVar[str] = ""

    def __init__(
        self,
        tmpdir: str | os.PathLike[str] | None,
        filter_port: int,
        sink_port: int,
        *,
        message_size_limit: int = 52428800,
    ) -> None:
        self.tmpdir = tmpdir
        self.filter_port = filter_port
        self.sink_port = sink_port
        self.message_size_limit = message_size_limit
        self.front_port = 0
        self.reinject_port = 0
        self.dir: Path | None = None
        self._reaped: _Reaped | None = None

    @property
    def config_dir(self) -> Path:
        """The instance's config_directory (for `postfix -c` and friends)."""
        assert self.dir is not None, "server not started"
        return self.dir / "conf"

    def start(self) -> Self:
        """Write the configuration and run `postfix -c DIR start`; return self."""
        if os.geteuid() != 0:
            raise RuntimeError("a private Postfix instance needs root")
        # The master opens data/master.lock after dropping privileges to `postfix`.
        self.dir = _private_dir("cleanmail-postfix-", self.tmpdir, "postfix")
        for name in ("conf", "queue", "data"):
            (self.dir / name).mkdir(mode=0o755)
        shutil.chown(self.dir / "data", "postfix")  # master.lock lives there
        for _attempt in range(3):
            if self._start_master(free_port(), free_port()):
                return self
            if "Address already in use" not in self.maillog():
                break  # only a port taken since free_port() is worth a retry
        log = self.maillog()
        self.stop()
        raise RuntimeError("Postfix did not start:\n" + log)

    def _start_master(self, front_port: int, reinject_port: int) -> bool:
        """Write main.cf/master.cf for these ports and start; return success."""
        assert self.dir is not None
        self.front_port, self.reinject_port = front_port, reinject_port
        ports = {
            "dir": self.dir,
            "filter_port": self.filter_port,
            "sink_port": self.sink_port,
            "front_port": front_port,
            "reinject_port": reinject_port,
            "message_size_limit": self.message_size_limit,
            **self._format(),
        }
        for name, text in (
            ("main.cf", self._MAIN_CF + self.MAIN_CF_FILTER_LINES + self._MAIN_CF_EXTRA),
            ("master.cf", self._MASTER_CF + self.MASTER_CF_FILTER_LINES + self._MASTER_CF_EXTRA),
        ):
            path = self.config_dir / name
            path.write_text(text.format(**ports))
            # Postfix waits up to 1.5 s for a file modified within the last second
            # to "cool down"; backdate it.
            past = time.time() - 10
            os.utime(path, (past, past))
        self._reaped = _Reaped(
            [_sbin("postfix"), "-c", str(self.config_dir), "start"],
            log_path=self.dir / "start.log",
            pidfile=self.dir / "queue/pid/master.pid",
            stop_signal=signal.SIGTERM,  # what `postfix stop` sends to the master
        )
        if self._reaped.exit_code(30) == 0:
            return True
        self._reaped.stop()
        self._reaped = None
        return False

    def _format(self) -> dict[str, object]:
        """More values for a subclass's lines in main.cf and master.cf."""
        return {}

    def postfix_command(self, *args: str) -> str:
        """Run a Postfix command (`postqueue`, `postsuper`, ...) with `-c DIR`; return stdout."""
        result = subprocess.run(
            [_sbin(args[0]), "-c", str(self.config_dir), *args[1:]],
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout

    def maillog(self) -> str:
        """Return the instance's mail log so far."""
        assert self.dir is not None
        path = self.dir / "maillog"
        text = path.read_text(errors="replace") if path.exists() else ""
        start_log = self.dir / "start.log"
        if start_log.exists():
            text += start_log.read_text(errors="replace")
        return text

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """Wait until `text` appears in the mail log; return the log or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.maillog()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not in maillog:\n{log}")
            time.sleep(0.05)
        return log

    def flush(self) -> None:
        """Ask the queue manager to retry deferred mail now (`postqueue -f`)."""
        self.postfix_command("postqueue", "-f")

    def queue(self) -> list[dict[str, object]]:
        """Return the queued messages as `postqueue -j` describes them."""
        out = self.postfix_command("postqueue", "-j")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def queue_size(self) -> int:
        """Return how many messages are in the instance's queue."""
        return len(self.queue())

    def send(self, mail_from: str, rcpt_tos: list[str], data: bytes | str) -> None:
        """Submit a message to the front smtpd."""
        with smtplib.SMTP("127.0.0.1", self.front_port, timeout=30) as smtp:
            smtp.sendmail(mail_from, rcpt_tos, data)


def http_request(
    url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None
) -> bytes:
    """One HTTP request with urllib (tests/servers.py needs no client library); the body."""
    import urllib.request

    request = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


class NxDomainServer(_Server):
    """A DNS server on 127.0.0.1 (UDP) that answers every query "no such domain" at once.

    Daemons pointed at it finish their look-ups immediately instead of waiting for a
    timeout, and nothing leaves the machine.
    """

    def __init__(self) -> None:
        self.port = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Bind a free UDP port and answer in a background thread; return self."""
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, args=(self._sock,), daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _serve(sock: socket.socket) -> None:
        import dns.message
        import dns.rcode

        while True:
            try:
                data, peer = sock.recvfrom(4096)
            except OSError:
                return  # closed by stop()
            try:
                reply = dns.message.make_response(dns.message.from_wire(data))
            except Exception:
                continue  # not a DNS query: no answer
            reply.set_rcode(dns.rcode.NXDOMAIN)
            with contextlib.suppress(OSError):
                sock.sendto(reply.to_wire(), peer)

    def stop(self) -> None:
        """Close the socket, which ends the thread."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


class RspamdServer(_ReapedServer):
    """A private rspamd on 127.0.0.1: Debian's configuration, our local.d, no network checks.

    The normal worker (``url``, for ``/checkv2``) and the controller (``controller_url``,
    for ``/learnspam``, ``/learnham`` and ``/stat``, behind ``password`` even from
    loopback) listen on free ports; state (Bayes in SQLite, caches) lives in the private
    directory.  ``extra_local_d`` adds or replaces files in ``local.d``, e.g.
    ``{"metadata_exporter.conf": "rules { ... }"}``; ``workers`` normal workers check mail.
    """

    USER = "_rspamd"
    # Checks that need DNS or outside services are off, so that results are the same
    # everywhere and no lookup waits for a timeout.
    NETWORK_MODULES: ClassVar[tuple[str, ...]] = (
        "arc",
        "asn",
        "dkim",
        "dmarc",
        "emails",
        "fuzzy_check",
        "hfilter",
        "rbl",
        "spf",
        "surbl",
    )

    def __init__(
        self,
        tmpdir: str | os.PathLike[str] | None = None,
        *,
        extra_local_d: dict[str, str] | None = None,
        password: str = "cleanmail-test",
        workers: int = 1,
    ) -> None:
        self.tmpdir = tmpdir
        self.extra_local_d = dict(extra_local_d or {})
        self.password = password
        self.workers = workers
        self._dns = NxDomainServer()
        self.user = self.USER if os.geteuid() == 0 else None
        self.port = 0
        self.controller_port = 0
        self.dir: Path | None = None
        self._reaped: _Reaped | None = None

    @property
    def url(self) -> str:
        """The normal worker's base URL (``/checkv2``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def controller_url(self) -> str:
        """The controller's base URL (learning, statistics)."""
        return f"http://127.0.0.1:{self.controller_port}"

    def start(self) -> Self:
        """Write the configuration and start rspamd in the foreground; return self."""
        self._dns.start()
        self.dir = _private_dir("cleanmail-rspamd-", self.tmpdir, self.user)
        for name in ("local.d", "override.d", "db", "run", "log"):
            (self.dir / name).mkdir(mode=0o755)
            if self.user:
                shutil.chown(self.dir / name, self.user, self.user)
        for _attempt in range(3):
            if self._start_rspamd(free_port(), free_port()):
                return self
            if "Address already in use" not in self.log():
                break  # only a port taken since free_port() is worth a retry
        log = self.log()
        self.stop()
        raise RuntimeError("rspamd did not start:\n" + log)

    def _write_config(self) -> None:
        assert self.dir is not None
        local = {
            "worker-normal.inc": (
                f'bind_socket = "127.0.0.1:{self.port}";\ncount = {self.workers};\n'
            ),
            "options.inc": (
                'filters = "chartable,regexp";\n'
                # Look-ups that are left (the client's reverse DNS) fail at once.
                f'dns {{ nameserver = ["127.0.0.1:{self._dns.port}"]; timeout = 1s; '
                "retransmits = 1; }\n"
            ),
            "classifier-bayes.conf": (
                # No autolearn: only the tests' own lessons change the counts they check.
                'backend = "sqlite3";\nmin_learns = 1;\nautolearn = false;\n'
                # Learned digests, or rspamd shares /var/lib/rspamd/learn_cache.sqlite.
                'cache { type = "sqlite3"; path = "${DBDIR}/learn_cache.sqlite"; }\n'
                'statfile { symbol = "BAYES_HAM"; spam = false; '
                'path = "${DBDIR}/bayes.ham.sqlite"; }\n'
                'statfile { symbol = "BAYES_SPAM"; spam = true; '
                'path = "${DBDIR}/bayes.spam.sqlite"; }\n'
            ),
            **self.extra_local_d,
        }
        override = {
            # secure_ip would let loopback learn without the password; tests want it checked.
            "worker-controller.inc": (
                f'bind_socket = "127.0.0.1:{self.controller_port}";\ncount = 1;\n'
                f'password = "{self.password}";\nenable_password = "{self.password}";\n'
                'secure_ip = "192.0.2.255";\nstatic_dir = "${WWWDIR}";\n'
            ),
            "worker-proxy.inc": f'bind_socket = "127.0.0.1:{free_port()}";\ncount = -1;\n',
            **{f"{name}.conf": "enabled = false;\n" for name in self.NETWORK_MODULES},
        }
        for folder, files in (("local.d", local), ("override.d", override)):
            for name, text in files.items():
                (self.dir / folder / name).write_text(text)

    def _start_rspamd(self, port: int, controller_port: int) -> bool:
        """Start rspamd on these ports; return whether both workers answer."""
        assert self.dir is not None
        self.port, self.controller_port = port, controller_port
        self._write_config()
        cmd = [_sbin("rspamd"), "-f", "-c", "/etc/rspamd/rspamd.conf"]
        cmd += ["-u", self.user, "-g", self.user] if self.user else ["-i"]
        for name, value in (
            ("LOCAL_CONFDIR", self.dir),
            ("DBDIR", self.dir / "db"),
            ("RUNDIR", self.dir / "run"),
            ("LOGDIR", self.dir / "log"),
        ):
            cmd += ["--var", f"{name}={value}"]
        self._reaped = _Reaped(
            cmd,
            log_path=self.dir / "rspamd.out",
            pidfile=self.dir / "run" / "no-pidfile",  # rspamd -f: the command itself
            stop_signal=signal.SIGTERM,
        )
        deadline = time.monotonic() + 90  # loading the rules takes 5-15 s on a busy machine
        while time.monotonic() < deadline:
            if self._reaped.exit_code(0.2) is not None:
                self._reaped.stop()
                self._reaped = None
                return False
            try:
                if all(http_request(f"{url}/ping") == b"pong\r\n" for url in self._urls()):
                    return True
            except OSError:
                continue
        self._reaped.stop()
        self._reaped = None
        return False

    def _urls(self) -> tuple[str, str]:
        return self.url, self.controller_url

    def stop(self) -> None:
        """Stop rspamd, remove its directory, and stop its DNS server."""
        super().stop()
        self._dns.stop()

    def log(self) -> str:
        """rspamd's own log and anything it printed."""
        assert self.dir is not None
        text = ""
        for path in (self.dir / "rspamd.out", self.dir / "log" / "rspamd.log"):
            if path.exists():
                text += path.read_text(errors="replace")
        return text

    def stat(self) -> dict[str, object]:
        """The controller's ``/stat`` (scanned and learned counts, Bayes statfiles)."""
        body = http_request(f"{self.controller_url}/stat", headers={"Password": self.password})
        return json.loads(body)

    def learned(self) -> int:
        """How many messages the Bayes classifier has learned (both classes)."""
        return int(self.stat().get("total_learns") or 0)


class SpamdServer(_ReapedServer):
    """A private SpamAssassin spamd on 127.0.0.1: local tests only, Bayes, TELL allowed."""

    USER = "debian-spamd"

    def __init__(
        self,
        tmpdir: str | os.PathLike[str] | None = None,
        *,
        allow_tell: bool = True,
        local_cf: str = "",
        children: int = 2,
    ) -> None:
        self.tmpdir = tmpdir
        self.allow_tell = allow_tell
        self.children = children
        self.local_cf = local_cf
        self.user = self.USER if os.geteuid() == 0 else None
        self.host = "127.0.0.1"
        self.port = 0
        self.dir: Path | None = None
        self._reaped: _Reaped | None = None

    def start(self) -> Self:
        """Write a private site configuration and start spamd; return self."""
        self.dir = _private_dir("cleanmail-spamd-", self.tmpdir, self.user)
        site, home = self.dir / "site", self.dir / "home"
        site.mkdir()
        home.mkdir()
        for pre in glob("/etc/spamassassin/*.pre"):  # the plugin list (Bayes among them)
            shutil.copy(pre, site)
        (site / "local.cf").write_text(
            "use_bayes 1\nbayes_auto_learn 0\n"
            f"bayes_path {home}/bayes\nbayes_file_mode 0770\n"
            "skip_rbl_checks 1\nuse_razor2 0\nuse_pyzor 0\ndns_available no\n" + self.local_cf
        )
        if self.user:
            shutil.chown(home, self.user, self.user)
        for _attempt in range(3):
            if self._start_spamd(free_port()):
                return self
            if "Address already in use" not in self.log():
                break
        log = self.log()
        self.stop()
        raise RuntimeError("spamd did not start:\n" + log)

    def _start_spamd(self, port: int) -> bool:
        """Start spamd on `port`; return whether it answers PING."""
        assert self.dir is not None
        self.port = port
        cmd = [
            _sbin("spamd"),
            "--nouser-config",
            "--local",
            f"--listen={self.host}:{port}",
            f"--allowed-ips={self.host}",
            f"--helper-home-dir={self.dir / 'home'}",
            f"--siteconfigpath={self.dir / 'site'}",
            "--configpath=/usr/share/spamassassin",
            f"--max-children={self.children}",
            "--min-children=1",
            "--min-spare=1",
            "--max-spare=1",
            f"--pidfile={self.dir / 'spamd.pid'}",
            "--syslog=stderr",
        ]
        if self.allow_tell:
            cmd.append("--allow-tell")
        if self.user:
            cmd += [f"--username={self.user}", f"--groupname={self.user}"]
        (self.dir / "spamd.pid").unlink(missing_ok=True)
        self._reaped = _Reaped(
            cmd,
            log_path=self.dir / "spamd.log",
            pidfile=self.dir / "spamd.pid",
            stop_signal=signal.SIGTERM,
        )
        deadline = time.monotonic() + 120  # compiling the rules takes 10-40 s on a busy machine
        while time.monotonic() < deadline:
            if self._reaped.exit_code(0.2) is not None:
                self._reaped.stop()
                self._reaped = None
                return False
            if self.ping():
                return True
        self._reaped.stop()
        self._reaped = None
        return False

    def ping(self) -> bool:
        """Whether spamd answers PING."""
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as sock:
                sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
                return b"PONG" in sock.recv(100)
        except OSError:
            return False

    def log(self) -> str:
        """spamd's log."""
        assert self.dir is not None
        path = self.dir / "spamd.log"
        return path.read_text(errors="replace") if path.exists() else ""


class MaildirPostfix(PostfixServer):
    """A private Postfix that delivers mail for some addresses into maildirs.

    Mail for ``addresses`` goes through Postfix's virtual(8) delivery agent to
    ``mail/<domain>/<user>/`` (Maildir format), owned by ``nobody``; anything else is
    still relayed to the sink. Submit to ``reinject_port`` (after the filter, as
    CLEANMAIL_RELAY does) to skip the content filter.
    """

    _MAIN_CF_EXTRA: ClassVar[str] = """\
virtual_mailbox_domains = {domains}
virtual_mailbox_base = {dir}/mail
virtual_mailbox_maps = texthash:{dir}/conf/mailboxes
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = 1
virtual_mailbox_limit = 0
virtual_transport = virtual
"""
    _MASTER_CF_EXTRA: ClassVar[str] = """\
virtual   unix  -       n       n       -       -       virtual
"""

    def __init__(
        self, tmpdir: str | os.PathLike[str] | None, sink_port: int, addresses: list[str]
    ) -> None:
        super().__init__(tmpdir, free_port(), sink_port)
        self.addresses = [address.lower() for address in addresses]
        self.owner = pwd.getpwnam("nobody")

    def _start_master(self, front_port: int, reinject_port: int) -> bool:
        """Make the maildir base and the address map, then start as the relay does."""
        assert self.dir is not None
        mail = self.dir / "mail"
        mail.mkdir(mode=0o755, exist_ok=True)
        os.chown(mail, self.owner.pw_uid, self.owner.pw_gid)
        # user@domain -> domain/user/ ; the trailing slash makes it a maildir.
        lines = [f"{address} {self._relative(address)}/\n" for address in self.addresses]
        (self.config_dir / "mailboxes").write_text("".join(lines))
        return super()._start_master(front_port, reinject_port)

    def _format(self) -> dict[str, object]:
        """The served domains and the maildirs' owner."""
        return {
            "domains": " ".join(sorted({a.rpartition("@")[2] for a in self.addresses})),
            "uid": self.owner.pw_uid,
            "gid": self.owner.pw_gid,
        }

    def maildir(self, address: str) -> Path:
        """The maildir of one address of a served domain."""
        assert self.dir is not None
        return self.dir / "mail" / self._relative(address)

    @staticmethod
    def _relative(address: str) -> str:
        user, _at, domain = address.lower().rpartition("@")
        return f"{domain}/{user}"

    def delivered(self, address: str) -> list[bytes]:
        """The messages in an address's maildir, oldest first (by file time, then name)."""
        new = self.maildir(address) / "new"
        if not new.is_dir():
            return []
        files = sorted(new.iterdir(), key=lambda path: (path.stat().st_mtime_ns, path.name))
        return [path.read_bytes() for path in files]

    def wait_for_mail(self, address: str, count: int, timeout: float = 20.0) -> list[bytes]:
        """Wait until an address's maildir holds `count` messages; return them."""
        deadline = time.monotonic() + timeout
        while len(found := self.delivered(address)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(found)} of {count} messages in {address}'s maildir:\n{self.maillog()}"
                )
            time.sleep(0.05)
        return found
