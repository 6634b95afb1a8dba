"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-24
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('dead_letters',
    sa.Column('source', sa.String(length=64), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('event_id', sa.String(length=255), nullable=True),
    sa.Column('subscription_id', sa.String(length=36), nullable=True),
    sa.Column('payload', sa.JSON(), nullable=True),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('project_id', sa.String(length=80), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('dead_letters', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dead_letters_event_id'), ['event_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_dead_letters_project_id'), ['project_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_dead_letters_subscription_id'), ['subscription_id'], unique=False)

    op.create_table('executions',
    sa.Column('function_id', sa.String(length=36), nullable=True),
    sa.Column('function_alias', sa.String(length=255), nullable=True),
    sa.Column('function_version', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('sync', sa.Boolean(), nullable=False),
    sa.Column('input', sa.JSON(), nullable=True),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('description', sa.String(length=255), nullable=True),
    sa.Column('logs', sa.Text(), nullable=True),
    sa.Column('reason', sa.String(length=32), nullable=True),
    sa.Column('event_id', sa.String(length=255), nullable=True),
    sa.Column('subscription_id', sa.String(length=36), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('lease_until', sa.DateTime(), nullable=True),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('project_id', sa.String(length=80), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('executions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_executions_event_id'), ['event_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_executions_function_id'), ['function_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_executions_project_id'), ['project_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_executions_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_executions_subscription_id'), ['subscription_id'], unique=False)

    op.create_table('runtimes',
    sa.Column('name', sa.String(length=255), nullable=True),
    sa.Column('description', sa.String(length=255), nullable=True),
    sa.Column('image', sa.String(length=255), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('is_public', sa.Boolean(), nullable=False),
    sa.Column('trusted', sa.Boolean(), nullable=False),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('project_id', sa.String(length=80), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('runtimes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_runtimes_project_id'), ['project_id'], unique=False)

    op.create_table('functions',
    sa.Column('name', sa.String(length=255), nullable=True),
    sa.Column('description', sa.String(length=255), nullable=True),
    sa.Column('runtime_id', sa.String(length=36), nullable=True),
    sa.Column('cpu', sa.Integer(), nullable=False),
    sa.Column('memory_size', sa.BigInteger(), nullable=False),
    sa.Column('timeout', sa.Integer(), nullable=True),
    sa.Column('code', sa.JSON(), nullable=False),
    sa.Column('entry', sa.String(length=80), nullable=True),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.Column('latest_version', sa.Integer(), nullable=False),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('project_id', sa.String(length=80), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['runtime_id'], ['runtimes.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('functions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_functions_project_id'), ['project_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_functions_runtime_id'), ['runtime_id'], unique=False)

    op.create_table('function_aliases',
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('function_id', sa.String(length=36), nullable=False),
    sa.Column('function_version', sa.Integer(), nullable=False),
    sa.Column('description', sa.String(length=255), nullable=True),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('project_id', sa.String(length=80), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['function_id'], ['functions.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('project_id', 'function_id', 'function_version'),
    sa.UniqueConstraint('project_id', 'name')
    )
    with op.batch_alter_table('function_aliases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_function_aliases_function_id'), ['function_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_function_aliases_project_id'), ['project_id'], unique=False)

    op.create_table('function_versions',
    sa.Column('function_id', sa.String(length=36), nullable=False),
    sa.Column('description', sa.String(length=255), nullable=True),
    sa.Column('version_number', sa.Integer(), nullable=False),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.Column('md5sum', sa.String(length=32), nullable=True),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('project_id', sa.String(length=80), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['function_id'], ['functions.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('project_id', 'function_id', 'version_number')
    )
    with op.batch_alter_table('function_versions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_function_versions_function_id'), ['function_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_function_versions_project_id'), ['project_id'], unique=False)

    op.create_table('subscriptions',
    sa.Column('name', sa.String(length=255), nullable=True),
    sa.Column('description', sa.String(length=255), nullable=True),
    sa.Column('source', sa.String(length=32), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('types', sa.JSON(), nullable=False),
    sa.Column('filters', sa.JSON(), nullable=False),
    sa.Column('function_id', sa.String(length=36), nullable=True),
    sa.Column('function_version', sa.Integer(), nullable=True),
    sa.Column('function_alias', sa.String(length=255), nullable=True),
    sa.Column('function_input', sa.Text(), nullable=True),
    sa.Column('pattern', sa.String(length=64), nullable=True),
    sa.Column('first_execution_time', sa.DateTime(), nullable=True),
    sa.Column('next_execution_time', sa.DateTime(), nullable=True),
    sa.Column('count', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('options', sa.JSON(), nullable=False),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('project_id', sa.String(length=80), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['function_id'], ['functions.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('subscriptions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_subscriptions_function_id'), ['function_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_subscriptions_next_execution_time'), ['next_execution_time'], unique=False)
        batch_op.create_index(batch_op.f('ix_subscriptions_project_id'), ['project_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_subscriptions_source'), ['source'], unique=False)
        batch_op.create_index(batch_op.f('ix_subscriptions_kind'), ['kind'], unique=False)




def downgrade() -> None:

    with op.batch_alter_table('subscriptions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_subscriptions_source'))
        batch_op.drop_index(batch_op.f('ix_subscriptions_kind'))
        batch_op.drop_index(batch_op.f('ix_subscriptions_project_id'))
        batch_op.drop_index(batch_op.f('ix_subscriptions_next_execution_time'))
        batch_op.drop_index(batch_op.f('ix_subscriptions_function_id'))

    op.drop_table('subscriptions')
    with op.batch_alter_table('function_versions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_function_versions_project_id'))
        batch_op.drop_index(batch_op.f('ix_function_versions_function_id'))

    op.drop_table('function_versions')
    with op.batch_alter_table('function_aliases', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_function_aliases_project_id'))
        batch_op.drop_index(batch_op.f('ix_function_aliases_function_id'))

    op.drop_table('function_aliases')
    with op.batch_alter_table('functions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_functions_runtime_id'))
        batch_op.drop_index(batch_op.f('ix_functions_project_id'))

    op.drop_table('functions')
    with op.batch_alter_table('runtimes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_runtimes_project_id'))

    op.drop_table('runtimes')
    with op.batch_alter_table('executions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_executions_subscription_id'))
        batch_op.drop_index(batch_op.f('ix_executions_status'))
        batch_op.drop_index(batch_op.f('ix_executions_project_id'))
        batch_op.drop_index(batch_op.f('ix_executions_function_id'))
        batch_op.drop_index(batch_op.f('ix_executions_event_id'))

    op.drop_table('executions')
    with op.batch_alter_table('dead_letters', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dead_letters_subscription_id'))
        batch_op.drop_index(batch_op.f('ix_dead_letters_project_id'))
        batch_op.drop_index(batch_op.f('ix_dead_letters_event_id'))

    op.drop_table('dead_letters')

