from lightloop.cli import main

main()
