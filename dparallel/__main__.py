from dparallel.cli import main

main()
