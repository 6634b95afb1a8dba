"""subscription_changes: a change log of the subscriptions table, so replicas follow it incrementally

Every transaction that creates, changes or deletes subscriptions bumps the one-row revision counter
and records the ids it touched under the new revision. A replica polls the counter (one row) and
reads only the changes after the revision it has, instead of reloading the whole table.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""
from alembic import op
import sqlalchemy as sa

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    counter = op.create_table(
        'subscription_revision',
        sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('revision', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.bulk_insert(counter, [{'id': 1, 'revision': 0}])
    op.create_table(
        'subscription_changes',
        sa.Column('revision', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('subscription_id', sa.String(length=36), nullable=False),
        sa.Column('changed_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('revision', 'subscription_id'),
    )


def downgrade() -> None:
    op.drop_table('subscription_changes')
    op.drop_table('subscription_revision')
