from irank.entry import main

main()
