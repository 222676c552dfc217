from rome_guard.cli import main

main()
