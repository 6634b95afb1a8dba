"""event history

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""
from alembic import op
import sqlalchemy as sa

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'events',
        sa.Column('id', sa.String(length=255), nullable=False),
        sa.Column('project_id', sa.String(length=80), nullable=False),
        sa.Column('source_kind', sa.String(length=32), nullable=False),
        sa.Column('source', sa.String(length=255), nullable=False),
        sa.Column('type', sa.String(length=255), nullable=False),
        sa.Column('subject', sa.String(length=1024), nullable=True),
        sa.Column('time', sa.DateTime(), nullable=True),
        sa.Column('received_at', sa.DateTime(), nullable=False),
        sa.Column('size', sa.Integer(), nullable=False),
        sa.Column('document', sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_events_project_id'), ['project_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_events_source_kind'), ['source_kind'], unique=False)
        batch_op.create_index(batch_op.f('ix_events_type'), ['type'], unique=False)
        batch_op.create_index(batch_op.f('ix_events_received_at'), ['received_at'], unique=False)


def downgrade() -> None:
    op.drop_table('events')
