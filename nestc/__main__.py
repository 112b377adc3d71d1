from nestc.cli import main

main()
