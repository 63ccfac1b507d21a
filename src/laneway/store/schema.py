"""Table definitions for SQLAlchemy Core queries. The migrations in `migrations/` create
them; keep the two in step (tests compare them)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    text,
)

Id = BigInteger().with_variant(Integer, "sqlite")  # SQLite only auto-increments INTEGER keys

metadata = MetaData()

sessions = Table(
    "sessions",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("tenant", String(64), nullable=False),
    Column("agent", String(64), nullable=False),
    Column("key", String(256), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("revision", Integer, nullable=False),
    Column("next_seq", Integer, nullable=False),
    Column("turns", Integer, nullable=False),
    Column("fence", BigInteger, nullable=False),
    Column("has_memories", Boolean, nullable=False, server_default=false()),
    UniqueConstraint("tenant", "agent", "key", name="uq_sessions_identity"),
    Index("ix_sessions_tenant_id", "tenant", "id"),
)

messages = Table(
    "messages",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("session_id", Id, ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("turn_id", String(40), nullable=False),
    Column("data", Text, nullable=False),
    Column("tokens", Integer, nullable=False),
    UniqueConstraint("session_id", "seq", name="uq_messages_session_seq"),
)

turns = Table(
    "turns",
    metadata,
    Column("id", String(40), nullable=False),
    Column("session_id", Id, ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float, nullable=False),
    Column("queue_wait_ms", Float, nullable=False),
    Column("usage", Text),
    Column("response", Text),
    Column("idempotency_key", String(200)),
    # Keyed by session (see migration 0003); on SQLite still a rowid table, appended to.
    PrimaryKeyConstraint("session_id", "id", name="pk_turns"),
    Index("ix_turns_idempotency", "session_id", "idempotency_key", "created_at",
          sqlite_where=text("idempotency_key IS NOT NULL"),
          postgresql_where=text("idempotency_key IS NOT NULL")),
)

memories = Table(
    "memories",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("tenant", String(64), nullable=False),
    Column("agent", String(64), nullable=False),
    Column("session_id", Id, ForeignKey("sessions.id", ondelete="CASCADE")),
    Column("text", Text, nullable=False),
    Column("pinned", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_memories_scope", "tenant", "agent", "session_id"),
)
