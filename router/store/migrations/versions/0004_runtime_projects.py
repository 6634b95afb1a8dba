"""runtime_projects: the projects a private runtime is shared with

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""
from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'runtime_projects',
        sa.Column('runtime_id', sa.String(length=36), nullable=False),
        sa.Column('project_id', sa.String(length=80), nullable=False),
        sa.ForeignKeyConstraint(['runtime_id'], ['runtimes.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('runtime_id', 'project_id'),
    )
    with op.batch_alter_table('runtime_projects', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_runtime_projects_project_id'), ['project_id'], unique=False)


def downgrade() -> None:
    op.drop_table('runtime_projects')
