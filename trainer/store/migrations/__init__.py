"""The store's Alembic migration environment, shipped inside the package and configured in code.

``env.py`` runs the revisions in ``versions/`` on a connection handed over by
:mod:`trainer.store.migrate` (no ``alembic.ini``: ``edgefleet db upgrade`` is the command users run).
Revision 0001 is the schema of the last release before migrations (commit 3ff547b); each later revision
is one explicit step that works on SQLite (batch mode where a table must change) and PostgreSQL.

To add a revision: change :mod:`trainer.store.schema`, then write ``versions/vNNNN_<what>.py`` with
``down_revision`` set to the current head (``script.py.mako`` is the template; Alembic's autogenerate,
run through :func:`trainer.store.migrate.schema_diff`, shows what it must contain), and extend
tests/test_migrations.py, which checks that upgraded databases match the models exactly.
"""
