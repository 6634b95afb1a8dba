"""executions: updates in place (no status index, fillfactor 50)

Every execution row is written twice on the routing path: inserted when it starts, updated when it
finishes. PostgreSQL can make that update a heap-only tuple (HOT) update, which writes no index
entry, only when no indexed column changes and the row's page has room for the new version. The
status index made every finish write a new entry into all six indexes of the table; it served only
listings filtered by status alone (the others are narrowed by project, function or subscription).
A fill factor of 50 leaves each page room for one new version of each of its rows; the old version
is pruned from the page without waiting for VACUUM, so the table does not grow from it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('executions', schema=None) as batch_op:
        batch_op.drop_index('ix_executions_status')
    if op.get_bind().dialect.name == 'postgresql':
        # Applies to pages written from now on; existing pages keep their layout.
        op.execute('ALTER TABLE executions SET (fillfactor = 50)')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE executions RESET (fillfactor)')
    with op.batch_alter_table('executions', schema=None) as batch_op:
        batch_op.create_index('ix_executions_status', ['status'], unique=False)
