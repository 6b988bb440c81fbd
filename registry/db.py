"""Engine, session factory and migrations.

Gateway start-up, in order:

    await migrate(url)                      # alembic upgrade head; safe to run on every start
    engine = make_engine(url)
    sessions = make_session_factory(engine)  # async_sessionmaker, expire_on_commit=False
    async with sessions() as session: ...    # one session per request

`url` is e.g. `sqlite+aiosqlite:////data/registry.db` (the folder is created) or
`postgresql+asyncpg://user@host/db`. Migrations ship inside the package; no alembic.ini is
needed. A schema change is a new revision, generated against a database at head:

    LORAPLEX_DATABASE_URL=sqlite+aiosqlite:////tmp/dev.db python -c "from alembic import command;
    from registry.db import alembic_config as c; command.upgrade(c(), 'head');
    command.revision(c(), message='what changed', autogenerate=True, rev_id='0003')"
"""

from __future__ import annotations

import asyncio
import fcntl
from pathlib import Path
from typing import IO, Any

import asyncpg
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, make_url, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect, ExceptionContext
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import NullPool

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant works; it only has to be the same for every process migrating this database.
_PG_MIGRATION_LOCK = 0x6C6F7261706C6578  # "loraplex"
# asyncpg's defaults are a 60 s connect timeout and none per statement: with the database host
# black-holed (failover, partition), every request then hung a minute before failing. These are
# short enough for a request to fail fast (and the gateway serve from its caches instead), long
# enough for a loaded server. Migrations run without the statement timeout: a replica waits on
# the migration lock for as long as another one takes.
CONNECT_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 10.0
# The longest a request waits for a pooled connection (SQLAlchemy's default is 30 s).
POOL_TIMEOUT_S = 10.0
# Connection-class errors (SQLSTATE 08), shutdown/start-up refusals (57P01-57P03) and a server
# out of connection slots (53300: what a failover's reconnect storm meets).
_PG_UNREACHABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.InterfaceError,
)

# A statement that gave up waiting on other transactions: a server-side statement_timeout or a
# cancel (57014), lock_timeout (55P03), a deadlock's victim (40P01). The server answered.
_PG_CONTENTION: tuple[type[BaseException], ...] = (
    asyncpg.QueryCanceledError,
    asyncpg.LockNotAvailableError,
    asyncpg.DeadlockDetectedError,
)
# SQLite's primary result codes for a lock another connection held past busy_timeout.
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6


def make_engine(
    url: str, *, command_timeout_s: float | None = COMMAND_TIMEOUT_S, **kwargs: Any
) -> AsyncEngine:
    """An AsyncEngine; SQLite gets foreign keys on, WAL and a busy timeout per connection.
    On PostgreSQL (asyncpg), connecting and each statement are bounded (CONNECT_TIMEOUT_S,
    `command_timeout_s`), and an unreachable server is reported as OperationalError, whichever
    way asyncpg noticed (see is_unreachable)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        if kwargs.get("poolclass") is None:
            kwargs.setdefault("pool_timeout", POOL_TIMEOUT_S)
        if parsed.get_driver_name() == "asyncpg":
            kwargs["connect_args"] = {
                "timeout": CONNECT_TIMEOUT_S,
                "command_timeout": command_timeout_s,
                **kwargs.get("connect_args", {}),
            }
        engine = create_async_engine(url, **kwargs)
        event.listen(engine.sync_engine, "do_connect", _connect_or_operational_error)
        event.listen(engine.sync_engine, "handle_error", _timeouts_as_operational_errors)
        return engine
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, **kwargs)

    @event.listens_for(engine.sync_engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # SQLite ignores foreign keys unless asked, per connection.
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=5000")
        if parsed.database and parsed.database != ":memory:":
            cursor.execute("PRAGMA journal_mode=WAL")  # readers no longer block the writer
        cursor.close()

    return engine


def is_unreachable(exc: BaseException) -> bool:
    """Whether `exc` means the database could not be reached or did not answer in time (a
    retry later may succeed), as opposed to a refused or failed statement."""
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)):
        return True  # the last: no pooled connection came free within the pool timeout
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        # asyncpg's own exception is the cause of the adapted one SQLAlchemy wraps.
        return isinstance(exc.orig, _PG_UNREACHABLE) or isinstance(
            getattr(exc.orig, "__cause__", None), _PG_UNREACHABLE
        )
    return isinstance(exc, (ConnectionError, TimeoutError, *_PG_UNREACHABLE))


def is_contention(exc: BaseException) -> bool:
    """Whether `exc` is a statement that gave up waiting on other transactions: a lock held
    past lock_timeout or SQLite's busy_timeout ("database is locked"), a deadlock, a server-side
    statement_timeout or cancel. The server answers and a retry may succeed, but it is no
    outage. (asyncpg's command_timeout is: the server did not answer at all.) SQLite's busy is
    also an OperationalError, so is_unreachable counts it; ask this to tell them apart."""
    orig = getattr(exc, "orig", None) or exc
    # asyncpg's exception is the cause of the adapted one SQLAlchemy wraps.
    if isinstance(orig, _PG_CONTENTION) or isinstance(orig.__cause__, _PG_CONTENTION):
        return True
    code = getattr(orig, "sqlite_errorcode", None)  # extended codes keep the primary in 8 bits
    return isinstance(code, int) and code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)


def _connect_or_operational_error(
    dialect: Dialect, _record: Any, cargs: tuple[Any, ...], cparams: dict[str, Any]
) -> Any:
    """asyncpg raises a refused or timed-out connect as a bare OSError/TimeoutError, which
    SQLAlchemy passes through unwrapped (its handlers only see DBAPI errors): as the DBAPI's
    OperationalError, it reads like any driver's "server unreachable"."""
    try:
        return dialect.connect(*cargs, **cparams)
    except OSError as exc:  # TimeoutError included
        raise dialect.loaded_dbapi.OperationalError(  # type: ignore[attr-defined]
            f"cannot connect to the database: {exc!r}", exc
        ) from exc


def _timeouts_as_operational_errors(context: ExceptionContext) -> BaseException | None:
    """A statement past command_timeout, or a socket error mid-statement, also arrives bare."""
    original = context.original_exception
    if context.sqlalchemy_exception is None and isinstance(original, OSError):
        return sa_exc.OperationalError(context.statement, context.parameters, original)
    return None


def make_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # expire_on_commit=False: objects stay readable after commit without lazy I/O in async code.
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.attributes["url"] = url  # attributes, not options: no %-interpolation of passwords
    return config


def make_migration_engine(url: str) -> AsyncEngine:
    """An engine whose transactions include DDL, for running migrations: the upgrade's DDL and
    its alembic_version bump commit together or not at all. PostgreSQL does that by itself.
    Python's sqlite3 commits before each DDL statement, so an upgrade interrupted mid-revision
    (killed pod, full disk) kept its added columns under the old version number, and every
    later upgrade failed on "duplicate column". SQLite gets SQLAlchemy's pysqlite recipe
    ("Serializable isolation / Savepoints / Transactional DDL"): the driver's own transaction
    handling off, and an explicit BEGIN when SQLAlchemy begins one. Only for migrations: on the
    serving engine a transaction would then read from a snapshot taken at BEGIN, and its first
    write fail at once (not wait) when another writer committed meanwhile. No pool: no
    connection in that mode outlives the migration."""
    if make_url(url).get_backend_name() != "sqlite":
        return make_engine(url, poolclass=NullPool, command_timeout_s=None)
    engine = make_engine(url, poolclass=NullPool)

    @event.listens_for(engine.sync_engine, "connect")
    def _no_driver_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # no implicit BEGIN, no COMMIT before DDL

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN")

    return engine


async def migrate(url: str | AsyncEngine, *, revision: str = "head") -> None:
    """Bring the schema to `revision` (default: the newest) in one transaction. Idempotent.
    Gateway replicas that start together are serialised: on PostgreSQL by an advisory lock, on
    a SQLite file by an exclusive lock on a file beside it. An upgrade that fails or is killed
    half way leaves the schema as it was (see make_migration_engine), so the next start simply
    runs it again."""
    given = make_engine(url, command_timeout_s=None) if isinstance(url, str) else url
    engine = given
    if _sqlite_lock_path(given) is not None:
        # A file database: a connection of its own with transactional DDL. (An in-memory
        # database exists only in the given engine's connection, and dies with a crash anyway.)
        engine = make_migration_engine(given.url.render_as_string(hide_password=False))
    lock_path = _sqlite_lock_path(engine)
    lock = await asyncio.to_thread(_lock_file, lock_path) if lock_path is not None else None
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_upgrade, revision)
    finally:
        if lock is not None:
            lock.close()  # closing the descriptor releases the lock
        if engine is not given:
            await engine.dispose()
        if isinstance(url, str):
            await given.dispose()


def _sqlite_lock_path(engine: AsyncEngine) -> Path | None:
    database = engine.url.database
    if engine.url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return Path(f"{database}.migrate-lock")


def _lock_file(path: Path) -> IO[bytes]:
    """Open `path` and hold an exclusive lock on it (blocks until other holders close it)."""
    handle = open(path, "ab")  # noqa: SIM115 - held open past this function: it is the lock
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    return handle


def _upgrade(connection: Connection, revision: str) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)
