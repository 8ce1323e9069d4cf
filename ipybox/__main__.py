from ipybox.cli import main

main()
