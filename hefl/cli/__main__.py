from hefl.cli import main

main()
