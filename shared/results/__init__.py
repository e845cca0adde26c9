"""Result stores, one module per back end (files, SQLite, PostgreSQL, S3) behind one contract: atomic,
first result wins, a batch durable once ``put_many`` returns; ``stores.open_result_store`` picks one."""
