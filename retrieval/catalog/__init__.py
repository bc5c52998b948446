"""The metadata catalog: tables, the single commit transaction, migrations, copying."""
