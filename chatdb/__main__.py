from chatdb.cli import main

main()
