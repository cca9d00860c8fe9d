-- EdgeFleet on PostgreSQL: one owner role for schema changes, one application role for the services.
-- Run as a superuser (psql -v ON_ERROR_STOP=1 -f roles.sql), after setting the passwords below.
-- docs/scale-out.md ("PostgreSQL") explains each step; tests/test_pg_roles.py runs this very file.
--
-- edgefleet_owner  owns the database and its tables: `edgefleet db upgrade` connects as it.
-- edgefleet_app    what trainer serve, ingest workers and the console connect as: rows only, no DDL,
--                  so a compromised service cannot drop or alter tables.

CREATE ROLE edgefleet_owner LOGIN PASSWORD 'change-me-owner';
CREATE ROLE edgefleet_app LOGIN PASSWORD 'change-me-app';
CREATE DATABASE edgefleet OWNER edgefleet_owner;
\connect edgefleet
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
ALTER SCHEMA public OWNER TO edgefleet_owner;
GRANT USAGE ON SCHEMA public TO edgefleet_app;
-- tables and sequences the owner creates from now on (every revision of `edgefleet db upgrade`)
ALTER DEFAULT PRIVILEGES FOR ROLE edgefleet_owner IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO edgefleet_app;
ALTER DEFAULT PRIVILEGES FOR ROLE edgefleet_owner IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO edgefleet_app;
