from vitshrink.cli import main

main()
