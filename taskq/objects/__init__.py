"""The functions (and views) of the taskq schema: one file per object, re-created when changed.

Tables change only through the numbered files in ``taskq/migrations/``, each
applied once. The objects here are different: each file holds the whole,
newest text of one function or view, and ``migrate`` (in the same transaction
and under the same advisory lock, after the numbered migrations) runs it again
whenever its checksum (sha256 of the text with the schema name filled in)
differs from the one recorded in the schema's ``objects`` table. Changing a
function is therefore an edit of its file, not a new migration that repeats
its body.

The file's name is the object's name: ``claim.sql`` holds ``claim()``. The
placeholders are those of the migrations: ``{schema}`` (the quoted schema
name), ``{enqueued_channel}`` and ``{finished_channel}`` (string literals).
The file starts with a header that ``taskq._migrations`` reads::

    -- object: function claim(text[], text[], integer, ...)
    -- requires: finish, rate_budget, rate_log_add

``object:`` is ``function NAME(ARGUMENT TYPES)`` or ``view NAME``: exactly
what ``DROP FUNCTION`` or ``DROP VIEW`` needs. ``requires:`` (optional) names
the objects that must exist before this one; they are created first.

The rules, for whoever changes a file:

- Write ``CREATE OR REPLACE``. It keeps the object's grants and identity.
- Argument types changed: update the ``object:`` line. ``migrate`` drops every
  other function of that name in the schema (the old signature) before
  creating the new one, so no stale overload is left to be called.
- Result type, ``OUT`` parameters, parameter names or defaults changed (or a
  view's columns removed, renamed or retyped): ``CREATE OR REPLACE`` refuses
  (SQLSTATE 42P13, 42809 or 42P16). ``migrate`` then drops the object named by
  the ``object:`` line and creates it again. Drops never cascade: if a view or
  a ``BEGIN ATOMIC`` function depends on the object, the migration fails
  instead of dropping it silently; drop the dependent too in a numbered
  migration (and delete its row from ``objects`` so that it is created again).
- A release that changes any file here also adds a numbered migration, even
  one holding only a comment that names the objects it changes. Processes of
  the previous release then see a schema newer than theirs and leave the
  objects alone; without the new version they would put their own (older)
  text back whenever they start during a rolling deploy.
- From version 4 on, numbered migrations never create, replace or call these
  objects: when a numbered migration runs, the objects may still be those of
  an older release (versions 1 to 3 predate this folder and created them).
  To remove an object, delete its file and drop it in a numbered migration
  that also deletes its row from ``objects``.
"""
