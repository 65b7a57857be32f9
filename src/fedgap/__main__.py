from fedgap.cli import main

main()
