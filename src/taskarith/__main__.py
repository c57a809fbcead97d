from taskarith.cli import main

main()
