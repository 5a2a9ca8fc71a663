from tracker import cli

cli.main()
