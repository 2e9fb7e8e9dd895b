from chatdb import migrations


def test_migrated_db_is_at_head(migrated_db):
    assert migrations.status(migrated_db.engine).up_to_date


def test_cli_migrate_on_empty_db(empty_db, cli):
    result = cli("migrate", "--database-url", empty_db.cli_url)
    assert result.exit_code == 0, result.output
    assert "0007_keys_with_user_id" in result.stdout
