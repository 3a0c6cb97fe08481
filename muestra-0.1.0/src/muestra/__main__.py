from muestra.cli.app import main

main()
