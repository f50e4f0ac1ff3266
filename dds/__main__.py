from dds.cli import main

main()
